from aria_trio.cli import main

main()
