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


def test_ports_we_pin_lie_below_the_ephemeral_range():
    # a Ray node binds its worker ports as long as it runs: a block in the ephemeral range
    # may meet an outgoing connection's source port (the raylet then never registers)
    from pathlib import Path

    from infra.process import free_port, free_port_block

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    taken: set[int] = set()
    for _ in range(50):
        base = free_port_block("127.0.0.1", 56, taken)
        assert base >= 10000 and base + 56 <= low
    assert len(taken) == 50 * 56  # no two blocks overlap
    # and the servers' ports, which a restart must find again (SeaweedFS: a pair 10000 apart)
    for offset in (0, 10000):
        port = free_port("127.0.0.1", offset)
        assert port >= 10000 and port + offset < low
