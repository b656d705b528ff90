"""The OctoPrint side: mixins, routes, printer connection, settings; the only code that imports
OctoPrint or Flask."""
