from customcrafter.cli import main

main()
