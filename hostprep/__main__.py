from hostprep.cli import main

main()
