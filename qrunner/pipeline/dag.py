"""Order stages so that each runs after the stages it needs."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple


class DagError(ValueError):
    pass


def topological_order(needs: Dict[str, Sequence[str]]) -> List[str]:
    """Kahn's algorithm; ties keep the order in which stages were declared (deterministic)."""
    for name, deps in needs.items():
        for dep in deps:
            if dep not in needs:
                raise DagError(f"stage {name!r} needs unknown stage {dep!r}; known: {', '.join(needs)}")
    declared = list(needs)
    remaining: Dict[str, set] = {n: set(d) for n, d in needs.items()}
    order: List[str] = []
    while remaining:
        ready = [n for n in declared if n in remaining and not remaining[n]]
        if not ready:
            cycle = _find_cycle({n: tuple(d) for n, d in remaining.items()})
            raise DagError(f"stage dependencies form a cycle: {' -> '.join(cycle)}")
        for n in ready:
            order.append(n)
            del remaining[n]
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def _find_cycle(graph: Dict[str, Tuple[str, ...]]) -> List[str]:
    visiting: List[str] = []
    seen: set = set()

    def visit(node: str) -> List[str]:
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in seen:
            return []
        visiting.append(node)
        for dep in graph.get(node, ()):
            found = visit(dep)
            if found:
                return found
        visiting.pop()
        seen.add(node)
        return []

    for start in graph:
        found = visit(start)
        if found:
            return found
    return list(graph)


def downstream_of(needs: Dict[str, Sequence[str]], name: str) -> List[str]:
    """Every stage that (transitively) needs `name`."""
    result: List[str] = []
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for other, deps in needs.items():
            if current in deps and other not in result:
                result.append(other)
                frontier.append(other)
    return result
