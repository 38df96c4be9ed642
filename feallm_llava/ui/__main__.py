"""`python -m feallm_llava.ui`: see `feallm_llava.ui.app`."""

import sys

from feallm_llava.ui.app import main

sys.exit(main())
