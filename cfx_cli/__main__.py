from cfx_cli.cli import main

main()
