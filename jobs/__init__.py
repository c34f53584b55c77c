"""Thin ``main(argv)`` entry points behind the ``reco`` console script."""
