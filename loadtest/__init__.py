"""Load tests for m1serve with locust: see loadtest/README.md.

Only `loadtest.run` and `loadtest.profiles` are meant to be imported; `loadtest/locustfile.py` runs inside locust's
own process (`locust -f loadtest/locustfile.py ...`), never imported next to ray or requests.
"""
