"""Checks for cluster_configs/: the launcher YAMLs against the schema Ray ships (the same
check `ray up` runs before touching a cloud), the RayJob against KubeRay v1's fields, and
the facts no schema sees: one shared mount path, star_dist installed after torch on every
node, one Ray version everywhere, placeholders instead of account ids.

Each check returns a list of problems, so the negative tests can feed it a broken copy
and assert the exact problem it reports. Nothing here starts Ray or touches a network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "cluster_configs"
LAUNCHER_FILES = ("aws-gpu.yaml", "gcp-gpu.yaml")
RAYJOB_FILE = "kuberay-rayjob.yaml"
PVC_FILE = "kuberay-pvc.yaml"
SHARED_MOUNT = "/mnt/shared"

# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go). A key outside these sets is a typo or a field from another
# version; the API server would reject or silently prune it.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
    "template", "scaleStrategy",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RAY_PIN = re.compile(r"ray\[default\]==([0-9][0-9.]*)")
STAR_DIST_INSTALL = re.compile(r"\bpip install\b.*\bstar[-_]dist\b")
TORCH_INSTALL = re.compile(r"\bpip install\b.*[\"' ]torch\b")


# ---------------------------------------------------------------- loading


def load_yaml(name: str) -> Any:
    """One YAML document from cluster_configs/."""
    return yaml.safe_load((CONFIG_DIR / name).read_text())


def load_all_yaml(name: str) -> list[Any]:
    """Every YAML document of a multi-document file."""
    return [d for d in yaml.safe_load_all((CONFIG_DIR / name).read_text()) if d is not None]


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    """The autoscaler JSON schema shipped inside the installed `ray` package.

    Fails (never skips) when it is missing: without it these configs are unchecked.
    """
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not path.is_file():
        pytest.fail(
            f"ray {ray.__version__} at {Path(ray.__file__).parent} ships no "
            f"autoscaler/ray-schema.json; the launcher configs cannot be validated. "
            f"Install ray[default] 2.x, which includes it."
        )
    return json.loads(path.read_text())


# ---------------------------------------------------------------- launcher checks


def schema_problems(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every violation of Ray's schema, as 'path: message'."""
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    ]


def mount_commands(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each `mount -t ...` in initialization_commands."""
    found = []
    for cmd in config.get("initialization_commands", []):
        tokens = shlex.split(cmd)
        for i, tok in enumerate(tokens):
            if tok == "mount" and "-t" in tokens[i:]:
                tail = tokens[i:]
                # a chained command ends at the next operator
                for op in ("&&", "||", ";"):
                    if op in tail:
                        tail = tail[: tail.index(op)]
                found.append((tail[-2], tail[-1]))
    return found


def shared_mount_problems(config: dict[str, Any], text: str) -> list[str]:
    """The shared file system is mounted once, at SHARED_MOUNT, on every node, and every
    path the file tells `star-dist merge` to use lies under it."""
    problems = []
    mounts = mount_commands(config)
    if len(mounts) != 1:
        return [f"expected exactly one mount command in initialization_commands, got {mounts}"]
    target = mounts[0][1]
    if target != SHARED_MOUNT:
        problems.append(f"mount target {target!r} is not {SHARED_MOUNT!r}")
    commands = config.get("initialization_commands", [])
    if not any(f"mkdir -p {target}" in c for c in commands):
        problems.append(f"no `mkdir -p {target}` before mounting")
    if not any(f"mountpoint -q {target}" in c for c in commands):
        problems.append(f"mount of {target} is not guarded by `mountpoint -q {target}`")
    for name, node_type in config.get("available_node_types", {}).items():
        if "initialization_commands" in node_type:
            problems.append(
                f"node type {name} overrides initialization_commands: its nodes would "
                f"not mount {target}"
            )
    merges = re.findall(r"star-dist merge\s+(\S+)\s+(\S+)", text)
    if not merges:
        problems.append("the file shows no `star-dist merge CONFIG OUT_DIR` command")
    for cfg_path, out_dir in merges:
        for path in (cfg_path, out_dir):
            if not path.startswith(target + "/"):
                problems.append(f"star-dist merge path {path} is not under {target}")
    return problems


def setup_problems(config: dict[str, Any]) -> list[str]:
    """Head and workers each install torch, then star_dist, after a pinned Ray."""
    problems = []
    common = config.get("setup_commands", [])
    if not any(RAY_PIN.search(c) for c in common):
        problems.append("setup_commands do not pin ray[default]==X.Y.Z")
    for role in ("head", "worker"):
        cmds = common + config.get(f"{role}_setup_commands", [])
        star = [i for i, c in enumerate(cmds) if STAR_DIST_INSTALL.search(c)]
        torch = [i for i, c in enumerate(cmds) if TORCH_INSTALL.search(c)]
        if not star:
            problems.append(f"{role} setup does not pip install star_dist")
        if not torch:
            problems.append(f"{role} setup does not pip install torch")
        if star and torch and min(torch) > min(star):
            problems.append(f"{role} setup installs star_dist before torch")
    for name, node_type in config.get("available_node_types", {}).items():
        if "worker_setup_commands" in node_type:
            problems.append(f"node type {name} overrides worker_setup_commands")
    return problems


def gpu_worker_problems(config: dict[str, Any]) -> list[str]:
    """A non-head node type offers GPUs, within the global max_workers."""
    problems = []
    head = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head}
    if not any(v.get("resources", {}).get("GPU", 0) >= 1 for v in workers.values()):
        problems.append("no worker node type declares a GPU resource")
    if config["available_node_types"][head].get("resources", {}).get("GPU", 0):
        problems.append("the head declares GPUs: actors could land on it")
    for name, node_type in workers.items():
        if node_type.get("min_workers", 0) > node_type.get("max_workers", 0):
            problems.append(f"{name}: min_workers > max_workers")
        if node_type.get("max_workers", 0) > config["max_workers"]:
            problems.append(f"{name}: max_workers above the global max_workers")
    return problems


def gcp_accelerator_problems(config: dict[str, Any]) -> list[str]:
    """GCP: GPUs come from guestAccelerators, need TERMINATE on maintenance, and the
    declared GPU resource must match (GCP does not autodetect resources)."""
    problems = []
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        accelerators = node.get("guestAccelerators", [])
        gpus = sum(a["acceleratorCount"] for a in accelerators)
        if gpus != node_type["resources"].get("GPU", 0):
            problems.append(f"{name}: {gpus} guestAccelerators but resources say "
                            f"{node_type['resources'].get('GPU', 0)} GPUs")
        if accelerators:
            scheduling = node.get("scheduling")
            if not isinstance(scheduling, dict):
                problems.append(f"{name}: scheduling must be an object, got {scheduling!r}")
            elif scheduling.get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{name}: GPU VMs need scheduling.onHostMaintenance TERMINATE")
        if "CPU" not in node_type["resources"]:
            problems.append(f"{name}: GCP needs resources.CPU declared")
    return problems


# ---------------------------------------------------------------- RayJob checks


def pod_mounts_pvc(template: dict[str, Any], claim: str) -> tuple[set[str], list[str]]:
    """Mount paths at which every container of a pod template sees the PVC `claim`."""
    problems = []
    spec = template.get("spec", {})
    volumes = [
        v["name"] for v in spec.get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    ]
    if not volumes:
        return set(), [f"no volume for persistentVolumeClaim {claim}"]
    common: set[str] | None = None
    for container in spec.get("containers", []):
        paths = {m["mountPath"] for m in container.get("volumeMounts", [])
                 if m.get("name") in volumes}
        if not paths:
            problems.append(f"container {container.get('name')} does not mount {claim}")
        common = paths if common is None else common & paths
    return common or set(), problems


def container_problems(template: dict[str, Any], where: str) -> list[str]:
    containers = template.get("spec", {}).get("containers", [])
    if not containers:
        return [f"{where}: template.spec.containers is empty"]
    return [f"{where}: container {c.get('name')!r} lacks {key}"
            for c in containers for key in ("name", "image") if not c.get(key)]


def rayjob_problems(job: dict[str, Any], claim: str) -> list[str]:
    """What KubeRay needs to create the cluster and run `star-dist merge` on shared paths."""
    problems = []
    if job.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion is {job.get('apiVersion')!r}, not 'ray.io/v1'")
    if job.get("kind") != "RayJob":
        problems.append(f"kind is {job.get('kind')!r}, not 'RayJob'")
    name = job.get("metadata", {}).get("name", "")
    if not DNS_LABEL.match(name):
        problems.append(f"metadata.name {name!r} is not a DNS label")
    spec = job.get("spec", {})
    problems += [f"spec.{k} is not a RayJob field" for k in set(spec) - RAYJOB_SPEC_FIELDS]
    entry = spec.get("entrypoint", "")
    if "star-dist merge" not in entry or "--address auto" not in entry:
        problems.append(f"entrypoint {entry!r} does not run `star-dist merge ... --address auto`")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true: the GPU pods would stay up")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or ttl < 0:
        problems.append(f"ttlSecondsAfterFinished {ttl!r} is not a non-negative integer")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"submissionMode {spec.get('submissionMode')!r} is not one of "
                        f"{sorted(SUBMISSION_MODES)}")

    cluster = spec.get("rayClusterSpec", {})
    problems += [f"rayClusterSpec.{k} is not a RayCluster field"
                 for k in set(cluster) - RAYCLUSTER_SPEC_FIELDS]
    merge_paths = re.findall(r"star-dist merge\s+(\S+)\s+(\S+)", entry)
    needed = set(merge_paths[0]) if merge_paths else set()

    head = cluster.get("headGroupSpec", {})
    problems += [f"headGroupSpec.{k} is not a field" for k in set(head) - HEAD_GROUP_FIELDS]
    problems += start_params_problems(head.get("rayStartParams"), "headGroupSpec")
    problems += container_problems(head.get("template", {}), "headGroupSpec")
    groups = [("headGroupSpec", head.get("template", {}))]

    workers = cluster.get("workerGroupSpecs", [])
    if not workers:
        problems.append("workerGroupSpecs is empty")
    total_gpus = 0
    for i, group in enumerate(workers):
        where = f"workerGroupSpecs[{i}]"
        problems += [f"{where}.{k} is not a field" for k in set(group) - WORKER_GROUP_FIELDS]
        if not group.get("groupName"):
            problems.append(f"{where} has no groupName")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) for c in counts):
            problems.append(f"{where}: minReplicas/replicas/maxReplicas must be integers")
        elif not counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{where}: need minReplicas <= replicas <= maxReplicas, got {counts}")
        problems += start_params_problems(group.get("rayStartParams"), where)
        template = group.get("template", {})
        problems += container_problems(template, where)
        for c in template.get("spec", {}).get("containers", []):
            res = c.get("resources", {})
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus is None:
                problems.append(f"{where}: container {c.get('name')} has no nvidia.com/gpu limit")
                continue
            if "nvidia.com/gpu" in res.get("requests", {}) and \
                    str(res["requests"]["nvidia.com/gpu"]) != str(gpus):
                problems.append(f"{where}: nvidia.com/gpu request differs from its limit")
            if isinstance(counts[1], int):
                total_gpus += int(gpus) * counts[1] * group.get("numOfHosts", 1)
        groups.append((where, template))

    for where, template in groups:
        mounted, mount_problems = pod_mounts_pvc(template, claim)
        problems += [f"{where}: {p}" for p in mount_problems]
        for path in needed:
            if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounted):
                problems.append(f"{where}: {path} is not on the shared PVC {claim}")

    workers_flag = re.search(r"--workers\s+(\d+)", entry)
    if workers_flag and int(workers_flag.group(1)) != total_gpus:
        problems.append(f"entrypoint asks for --workers {workers_flag.group(1)} but the "
                        f"worker groups hold {total_gpus} GPUs")
    return problems


def start_params_problems(params: Any, where: str) -> list[str]:
    """rayStartParams: a map of strings (KubeRay turns each into `--key=value`)."""
    if not isinstance(params, dict):
        return [f"{where}: rayStartParams must be a map, got {params!r}"]
    return [f"{where}: rayStartParams[{k}] must be a string, got {v!r}"
            for k, v in params.items() if not isinstance(v, str)]


# ---------------------------------------------------------------- tests: launchers


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_matches_ray_schema(name: str, ray_schema: dict[str, Any]) -> None:
    assert schema_problems(load_yaml(name), ray_schema) == []


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_offline_bootstrap_checks(name: str) -> None:
    # The offline half of what `ray up` does before calling the cloud: merge with the
    # provider defaults, then validate (head type listed, min_workers within max_workers,
    # docker block consistent). Internal API of Ray 2.x; if it moves, update the import.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_yaml(name))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda c: c.update(worker_start_ray_command=c.pop("worker_start_ray_commands")),
         "Additional properties are not allowed"),
        (lambda c: c["available_node_types"]["ray_worker_gpu"].pop("resources"),
         "'resources' is a required property"),
        (lambda c: c["available_node_types"]["ray_worker_gpu"]["resources"].update(GPU=0.5),
         "0.5 is not of type 'integer'"),
        (lambda c: c.update(setup_commands="pip install star-dist"),
         "is not of type 'array'"),
        (lambda c: c.pop("provider"), "'provider' is a required property"),
    ],
    ids=["misspelled-key", "missing-resources", "fractional-gpu", "string-commands",
         "no-provider"],
)
def test_schema_rejects_broken_copy(break_it, expected: str, ray_schema: dict) -> None:
    config = copy.deepcopy(load_yaml("gcp-gpu.yaml"))
    break_it(config)
    problems = schema_problems(config, ray_schema)
    assert any(expected in p for p in problems), problems
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_shared_mount_is_consistent(name: str) -> None:
    assert shared_mount_problems(load_yaml(name), (CONFIG_DIR / name).read_text()) == []


def test_both_launchers_mount_the_same_source_kind_and_path() -> None:
    (aws_src, aws_dst), = mount_commands(load_yaml("aws-gpu.yaml"))
    (gcp_src, gcp_dst), = mount_commands(load_yaml("gcp-gpu.yaml"))
    assert aws_dst == gcp_dst == SHARED_MOUNT
    assert re.fullmatch(r"fs-X{8}\.efs\.[a-z0-9-]+\.amazonaws\.com:/", aws_src), aws_src
    assert gcp_src.startswith("YOUR_FILESTORE_IP:/"), gcp_src


def test_shared_mount_check_catches_drift() -> None:
    config = load_yaml("aws-gpu.yaml")
    text = (CONFIG_DIR / "aws-gpu.yaml").read_text()

    moved = copy.deepcopy(config)
    moved["initialization_commands"] = [
        c.replace("/mnt/shared", "/mnt/efs") for c in moved["initialization_commands"]
    ]
    assert "mount target '/mnt/efs' is not '/mnt/shared'" in shared_mount_problems(moved, text)
    assert any("/mnt/shared/configs/merge.yaml is not under /mnt/efs" in p
               for p in shared_mount_problems(moved, text))

    overridden = copy.deepcopy(config)
    overridden["available_node_types"]["ray.worker.gpu"]["initialization_commands"] = []
    assert any("ray.worker.gpu overrides initialization_commands" in p
               for p in shared_mount_problems(overridden, text))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_setup_installs_torch_then_star_dist_on_every_node(name: str) -> None:
    assert setup_problems(load_yaml(name)) == []


def test_setup_check_catches_missing_or_misordered_install() -> None:
    config = load_yaml("aws-gpu.yaml")

    no_star = copy.deepcopy(config)
    no_star["worker_setup_commands"] = [
        c for c in no_star["worker_setup_commands"] if not STAR_DIST_INSTALL.search(c)
    ]
    assert setup_problems(no_star) == ["worker setup does not pip install star_dist"]

    reordered = copy.deepcopy(config)
    reordered["head_setup_commands"].reverse()
    assert "head setup installs star_dist before torch" in setup_problems(reordered)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_gpu_workers_and_cpu_head(name: str) -> None:
    assert gpu_worker_problems(load_yaml(name)) == []


def test_gcp_accelerators_match_resources_and_scheduling() -> None:
    config = load_yaml("gcp-gpu.yaml")
    assert gcp_accelerator_problems(config) == []

    listed = copy.deepcopy(config)  # the list form Ray's old examples used (ray#46248)
    listed["available_node_types"]["ray_worker_gpu"]["node_config"]["scheduling"] = [
        {"onHostMaintenance": "TERMINATE"}
    ]
    assert any("scheduling must be an object" in p for p in gcp_accelerator_problems(listed))


def test_aws_efs_region_matches_provider_and_nodes_terminate() -> None:
    config = load_yaml("aws-gpu.yaml")
    (source, _), = mount_commands(config)
    assert source.split(".")[2] == config["provider"]["region"]
    assert config["provider"]["cache_stopped_nodes"] is False
    for node_type in config["available_node_types"].values():
        assert re.fullmatch(r"ami-X{17}", node_type["node_config"]["ImageId"])


# ---------------------------------------------------------------- tests: KubeRay


def pvc_claim_name() -> str:
    (pvc,) = [d for d in load_all_yaml(PVC_FILE) if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every Ray pod mounts it at once"
    return pvc["metadata"]["name"]


def test_rayjob_has_what_kuberay_requires() -> None:
    assert rayjob_problems(load_yaml(RAYJOB_FILE), pvc_claim_name()) == []


def test_rayjob_check_catches_broken_copies() -> None:
    job = load_yaml(RAYJOB_FILE)
    claim = pvc_claim_name()

    def broken(edit) -> list[str]:
        copy_ = copy.deepcopy(job)
        edit(copy_)
        return rayjob_problems(copy_, claim)

    cluster = "rayClusterSpec"
    assert "spec.shutdownAfterJobFinish is not a RayJob field" in broken(
        lambda j: j["spec"].update(shutdownAfterJobFinish=True))
    assert "apiVersion is 'ray.io/v1alpha1', not 'ray.io/v1'" in broken(
        lambda j: j.update(apiVersion="ray.io/v1alpha1"))
    assert any("has no nvidia.com/gpu limit" in p for p in broken(
        lambda j: j["spec"][cluster]["workerGroupSpecs"][0]["template"]["spec"]
        ["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")))
    assert any("/output/merged is not on the shared PVC" in p for p in broken(
        lambda j: j["spec"][cluster]["workerGroupSpecs"][0]["template"]["spec"]
        ["containers"][0]["volumeMounts"].pop()))
    assert any("need minReplicas <= replicas <= maxReplicas" in p for p in broken(
        lambda j: j["spec"][cluster]["workerGroupSpecs"][0].update(maxReplicas=1)))
    assert "headGroupSpec: rayStartParams[num-cpus] must be a string, got 0" in broken(
        lambda j: j["spec"][cluster]["headGroupSpec"]["rayStartParams"].update(
            {"num-cpus": 0}))
    assert any("--workers 8 but the worker groups hold 12 GPUs" in p for p in broken(
        lambda j: j["spec"][cluster]["workerGroupSpecs"][0].update(
            replicas=3, maxReplicas=3)))


# ---------------------------------------------------------------- tests: across files


def test_one_ray_version_everywhere() -> None:
    versions = {
        name: RAY_PIN.search("\n".join(load_yaml(name)["setup_commands"])).group(1)
        for name in LAUNCHER_FILES
    }
    job = load_yaml(RAYJOB_FILE)["spec"]["rayClusterSpec"]
    versions[RAYJOB_FILE] = job["rayVersion"]
    for group in [job["headGroupSpec"], *job["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            versions[f"{RAYJOB_FILE} image {c['name']}"] = re.search(
                r"-ray([0-9.]+)-", c["image"]).group(1)
    dockerfile = (CONFIG_DIR / "Dockerfile").read_text()
    versions["Dockerfile"] = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert len(set(versions.values())) == 1, versions


def test_placeholders_are_obvious() -> None:
    gcp = load_yaml("gcp-gpu.yaml")
    assert gcp["provider"]["project_id"].startswith("YOUR_")
    for name in (*LAUNCHER_FILES, RAYJOB_FILE, PVC_FILE, "Dockerfile"):
        text = (CONFIG_DIR / name).read_text()
        assert re.search(r"XXXX|YOUR_", text), f"{name}: no placeholder left to fill?"
        assert not re.search(r"\b(ami|fs|sg|subnet)-[0-9a-f]{8,17}\b", text), (
            f"{name}: looks like a real AWS resource id"
        )


def test_readme_names_existing_files_and_the_commands() -> None:
    readme = (CONFIG_DIR / "README.md").read_text()
    for ref in set(re.findall(r"cluster_configs/([\w.-]+)", readme)):
        assert (CONFIG_DIR / ref).is_file(), f"README refers to missing cluster_configs/{ref}"
    for command in ("ray up", "ray attach", "ray rsync-up", "ray dashboard",
                    "ray job submit --address http://127.0.0.1:8265", "ray down",
                    "kubectl apply -f", "kubectl delete", "star-dist plan"):
        assert command in readme, f"README does not show `{command}`"
    merges = re.findall(r"star-dist merge\s+(\S+)\s+(\S+)", readme)
    merges.remove(("CONFIG", "OUT_DIR"))  # the synopsis, in the introduction
    assert merges, "README shows no concrete `star-dist merge` command"
    for cfg_path, out_dir in merges:
        assert cfg_path.startswith((SHARED_MOUNT + "/", "/models/")), cfg_path
        assert out_dir.startswith((SHARED_MOUNT + "/", "/output/")), out_dir


def star_dist_commands(text: str) -> list[str]:
    """Every `star-dist merge|plan ...` command in a file, continuation lines joined and
    comment markers stripped, up to the end of the command (prose mentions, with no
    arguments, are left out)."""
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = (m.group(0).strip() for m in re.finditer(r"star-dist (?:merge|plan)\b[^\n'`#(]*", joined))
    return [command for command in found if len(command.split()) > 2]


@pytest.mark.parametrize("name", [*LAUNCHER_FILES, RAYJOB_FILE, "README.md"])
def test_every_documented_command_parses_with_the_real_cli(name: str) -> None:
    """A flag renamed or removed in the CLI must not live on in the cluster docs."""
    from star_dist.cli import build_parser

    text = (CONFIG_DIR / name).read_text()
    if name == RAYJOB_FILE:
        text = load_yaml(name)["spec"]["entrypoint"]
    commands = star_dist_commands(text)
    assert commands, f"{name}: no star-dist command found"
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{command}` does not parse with star-dist's own parser")
