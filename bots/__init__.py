"""Entry points: the ``supportbot`` command line and the service that it runs."""
