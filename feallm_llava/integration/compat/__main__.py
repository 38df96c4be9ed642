"""`python -m feallm_llava.integration.compat`: the table of shims, and which are active here."""

from feallm_llava.integration.compat import table

print(table())
