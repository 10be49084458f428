from puzzle.cli import main

main()
