"""What an admin sees: apply, status (after apply, after a flush, with drift, with
containers), flush and container output at 80 columns without colours, against
golden files (HOSTPREP_REGEN=1 rewrites them; a missing one fails)."""

from __future__ import annotations

from kernel_conftest import tool      # registered by tests/cli/conftest.py
from tests.helpers import env_file


def test_status_after_apply(transcript, check_golden):
    transcript.run("apply", "-i", "eth1", "-y", "-p", "203.0.113.7")
    transcript.run("status")
    transcript.run("status", "-v")
    check_golden("status_after_apply", transcript.text())


def test_status_after_flush(transcript, check_golden):
    transcript.run("apply", "-i", "eth1", "-y")
    transcript.run("flush")
    transcript.run("status", check_code=1)
    check_golden("status_after_flush", transcript.text())


def test_status_with_drift(transcript, host, check_golden):
    transcript.run("apply", "-i", "eth1", "-y")
    transcript.note("an admin deletes one rule of HOSTPREP-SSH by hand")
    if host.native:
        listing = host.run(host.box.host, ["nft", "-a", "list", "chain", "inet", "hostprep", "HOSTPREP-SSH-v4"]).stdout
        handle = next(ln.rsplit("# handle ", 1)[1] for ln in listing.splitlines()
                      if "# handle " in ln and "hostprep ssh" in ln)
        host.run(host.box.host, ["nft", "delete", "rule", "inet", "hostprep", "HOSTPREP-SSH-v4", "handle", handle])
    else:
        rule = next(ln for ln in host.save(4, counters=False).splitlines() if ln.startswith("-A HOSTPREP-SSH "))
        host.run(host.box.host, [tool(host.variant, 4, "restore"), "--noflush"],
                 input=f"*filter\n-D {rule[3:]}\nCOMMIT\n")
    transcript.run("status", check_code=1)
    transcript.run("apply", "--dry-run", "-i", "eth1", "-y")
    check_golden("status_with_drift", transcript.text())


def test_status_with_containers(transcript, tmp_path, check_golden):
    installer = env_file(tmp_path, "installer.env", PROXY_BINDING_IP="198.51.100.10")
    fin = env_file(tmp_path, "finesse.env", TEMPLATE_TYPE="finesse", NGX_PRXY_FIN_PORT="8445",
                   IPTABLES_CONNECTION_LIMIT_ABOVE="10", IPTABLES_HASH_LIMIT_UPTO="6",
                   IPTABLES_HASH_LIMIT_BURST="8")
    core = env_file(tmp_path, "core.env", NGX_RATELIMIT_DISABLE_IPS="203.0.113.200|2001:db8:f::99",
                    NGX_LOAD_BALANCER_IPS="198.51.100.99")
    ids = env_file(tmp_path, "ids.env", TEMPLATE_TYPE="ids", NGX_PRXY_IDS_PORT="8553")
    core2 = env_file(tmp_path, "core2.env", NGX_TRAFFIC_RESTRICTED="true", NGX_LOAD_BALANCER_IPS="198.51.100.98")
    transcript.run("apply", "-i", "eth1", "-y")
    transcript.run("container", "up", "finesse", "--env", str(fin), "--core", str(core),
                   "--installer", str(installer))
    transcript.run("container", "up", "ids", "--env", str(ids), "--core", str(core2),
                   "--installer", str(installer))
    status = transcript.run("status")
    listed = transcript.run("container", "list")
    # at 80 columns nothing of status or container list is wider (the terminal would wrap it)
    assert [ln for ln in status.stdout.splitlines() + listed.stdout.splitlines() if len(ln) > 80] == []
    transcript.run("container", "down", "ids")
    check_golden("status_with_containers", transcript.text())
