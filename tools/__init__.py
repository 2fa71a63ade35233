"""fxq's bench and doc scripts, and the data they share (baselines, photos). Run a script as
`python tools/NAME.py`; tests import the shared modules as `tools.photos`."""
