"""The hakobu broker: socket loop, scheduler and store, plus the `hakobu` command line.

Nothing is imported here, so `hakobu --help` works whatever parts are installed.
"""
