"""Independent eager references of ATS, used by the tests and by ``ats-fx demo``."""
