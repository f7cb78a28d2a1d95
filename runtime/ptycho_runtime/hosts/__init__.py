"""The runtime inside other programs: ``worker`` (a bundle warm in a process of its own) and ``ptychodus``.

A new host (acquisition software, a GUI) goes here, as a module or
sub-package that uses ``inference`` and ``files`` and is imported by nothing
below it. Importing ``hosts`` imports no host's own package (ptychodus is an
optional extra, imported only by ``hosts.ptychodus``).
"""
