from hostprep.entry import main

main()
