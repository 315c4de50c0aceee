from astcli.cli import main

main()
