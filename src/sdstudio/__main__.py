from sdstudio.cli.app import main

main()
