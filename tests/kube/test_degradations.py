"""What Kubernetes cannot express is refused, not dropped: one fixture per degradation
(tests/kube/fixtures/degradations/<id>.yaml) shows it appearing with its workaround, refusing
the compile until accepted by name, and (where something removes it) going away."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sandbox.kube import compiler as kc
from sandbox.kube import degradations as dg
from sandbox.kube.config import KubeConfigError, config_from_dict
from sandbox.policy import load_policy

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p.stem for p in (FIXTURES / "degradations").glob("*.yaml"))


def _profile(ref: str) -> str:
    return str(Path(__file__).parent / ref) if ref.startswith("fixtures/") else ref


def _case(did: str) -> dict:
    return yaml.safe_load((FIXTURES / "degradations" / f"{did}.yaml").read_text())


def test_every_degradation_has_a_fixture():
    assert sorted(dg.KNOWN_IDS) == CASES


@pytest.mark.parametrize("did", CASES)
def test_degradation_is_listed_with_its_workaround(did):
    case = _case(did)
    found = {d.id: d for d in dg.find(load_policy(_profile(case["profile"])), config_from_dict(case.get("config", {})))}
    assert did in found
    assert len(found[did].lost) > 20 and len(found[did].workaround) > 20 and found[did].accepted == ""


@pytest.mark.parametrize("did", CASES)
def test_degradation_refuses_the_compile_until_accepted_by_name(did):
    case = _case(did)
    pol = load_policy(_profile(case["profile"]))
    others = {k: "accepted for this test" for k in dg.KNOWN_IDS if k != did}
    with pytest.raises(dg.KubeRefused) as e:
        kc.compile_manifests(pol, config_from_dict({**case.get("config", {}), "accept": others}))
    assert [k for k, _ in e.value.problems] == [did], "exactly the unaccepted degradation is named"
    assert f"accept: {{{did}: <reason>}}" in str(e.value)
    ok = config_from_dict({**case.get("config", {}), "accept": {**others, did: "platform team accepted it"}})
    docs = kc.compile_manifests(pol, ok)
    assert len(docs) == 4
    assert {d.id: d.accepted for d in dg.find(pol, ok)}[did] == "platform team accepted it"


@pytest.mark.parametrize("did", [c for c in CASES if "cleared_by" in _case(c)])
def test_degradation_goes_away_where_the_cluster_can_enforce_it(did):
    case = _case(did)
    clear = case["cleared_by"]
    pol = load_policy(_profile(clear.get("profile", case["profile"])))
    cfg = config_from_dict({**case.get("config", {}), **clear.get("config", {})})
    assert did not in {d.id for d in dg.find(pol, cfg)}


def test_disk_workspace_with_a_storage_class_is_an_ephemeral_volume_with_real_enospc():
    pol = load_policy("disk-workspace")
    cfg = config_from_dict({"disk_storage_class": "standard-rwo", "accept": {k: "accepted for this test" for k in dg.KNOWN_IDS}})
    tpl = kc.compile_manifests(pol, cfg)[1]
    ws = next(v for v in tpl["spec"]["podTemplate"]["spec"]["volumes"] if v["name"] == "workspace")
    spec = ws["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert spec["storageClassName"] == "standard-rwo" and spec["resources"]["requests"]["storage"] == "1024Mi"


def test_host_mount_is_refused_even_when_everything_is_accepted():
    pol = load_policy(str(FIXTURES / "profiles" / "host-mount.yaml"))
    cfg = config_from_dict({"accept": {k: "accepted for this test" for k in dg.KNOWN_IDS}})
    with pytest.raises(dg.KubeRefused) as e:
        kc.compile_manifests(pol, cfg)
    assert [k for k, _ in e.value.problems] == ["read_only_mounts./data"]
    assert "/srv/datasets" in str(e.value)


def test_accepting_an_unknown_degradation_is_an_error():
    pol = load_policy("gvisor")
    cfg = config_from_dict({"accept": {**{k: "accepted for this test" for k in dg.KNOWN_IDS},
                                       "limits.pid": "typo of limits.pids"}})
    with pytest.raises(dg.KubeRefused, match="accept.limits.pid: not a degradation id"):
        kc.compile_manifests(pol, cfg)


def test_acceptance_needs_a_written_reason():
    with pytest.raises(KubeConfigError, match="accept: limits.pids: needs a written reason"):
        config_from_dict({"accept": {"limits.pids": "ok"}}, source="kube.yaml")
