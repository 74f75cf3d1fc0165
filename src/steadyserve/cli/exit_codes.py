"""Every exit code of the CLI, in one place."""

OK = 0
FAILURE = 1  # the server stopped because something went wrong at run time
USAGE = 2  # argparse's own code for bad flags
CONFIG = 3  # the configuration (file, flags, service class) is wrong
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
