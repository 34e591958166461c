import os

from cluster.runner import use_ray_env


def test_token_mode_applies_even_after_ray_cached_its_config():
    # Regression: a driver that asked Ray anything before RAY_AUTH_MODE was set kept the
    # cached 'disabled' mode and failed to join a token-auth cluster.
    from ray._raylet import get_authentication_mode

    saved = os.environ.get("RAY_AUTH_MODE")
    try:
        use_ray_env({"RAY_AUTH_MODE": "disabled"})
        assert get_authentication_mode() == 0
        use_ray_env({"RAY_AUTH_MODE": "token"})
        assert get_authentication_mode() == 1
    finally:
        use_ray_env({"RAY_AUTH_MODE": saved or "disabled"})
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE")
