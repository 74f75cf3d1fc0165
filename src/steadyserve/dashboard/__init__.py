"""The operator's web page, served by the gateway at `/` (routes), and what it draws (data).

The charting library (uPlot) is fetched from the npm registry by `make install` into
`static/`; nothing is loaded from a CDN at run time.
"""
