from txcompile.cli import entry

entry()
