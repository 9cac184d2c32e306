from qrunner.cli import main

main()
