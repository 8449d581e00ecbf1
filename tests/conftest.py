import os

import hypothesis

# Tests compile from scratch and leave nothing in ~/.cache (kl_rl.runner's persistent cache).
os.environ.setdefault("KL_RL_CACHE_DIR", "off")

hypothesis.settings.register_profile("kl_rl", deadline=None, max_examples=50, derandomize=True)
hypothesis.settings.load_profile("kl_rl")
