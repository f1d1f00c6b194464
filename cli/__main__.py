from dgo_compile.cli.app import main

main()
