from wbtools.cli import main

main()
