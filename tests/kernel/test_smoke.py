"""Smoke: apply in the sandbox, an unopened port is dropped on the external NIC and answered inside."""

from hostprep.sandbox import HOST_EXT4, HOST_INT4

NATIVE = True      # runs on the native nft backend too (conftest.variant)


def test_unopened_port_dropped_outside_answered_inside(host):
    host.apply()
    before = host.counter(4, "HOSTPREP-DENY")
    outside = host.probe1(host.box.inet, kind="tcp", dst=HOST_EXT4, dport=8445)
    inside = host.probe1(host.box.admin, kind="tcp", dst=HOST_INT4, dport=8445)
    assert outside["answered"] is False
    assert inside["reply"] == "RA"
    assert host.counter(4, "HOSTPREP-DENY") == before + 1
