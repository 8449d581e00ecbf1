import hypothesis

hypothesis.settings.register_profile("kl_rl", deadline=None, max_examples=50, derandomize=True)
hypothesis.settings.load_profile("kl_rl")
