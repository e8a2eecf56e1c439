"""The seed's SQL, the truth every dashboard must equal at a quiet moment.

It lives in projector/oracle.py, so that scripts/verify.py judges a running system by the very
same SQL; the tests keep importing it from here.
"""

from projector.oracle import GLOBAL, OWNER, RECENT, expected, normalise

__all__ = ["GLOBAL", "OWNER", "RECENT", "expected", "normalise"]
