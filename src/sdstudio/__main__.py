from sdstudio.cli import main

main()
