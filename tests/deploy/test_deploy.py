#!/usr/bin/env python3
"""Checks deploy/: each file parses, and every reattn command line in it uses only flags that
the binary's --help lists (so a renamed flag breaks this test, not a cluster job)."""
import argparse
import os
import re
import shlex
import subprocess
import sys

import yaml


def flags_of(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30, env=dict(
        os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def used_flags(argv, name):
    """Flags given to the reattn binary `name` in one argv list."""
    for i, word in enumerate(argv):
        if os.path.basename(word.strip('"')) == name:
            return [w.split("=")[0] for w in argv[i + 1:] if w.startswith("--")]
    return None


def shell_commands(text):
    """Logical command lines of a shell script (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield shlex.split(line, comments=True)
    for line in text.splitlines():  # commands shown in comments too
        if line.lstrip().startswith("#") and "reattn-" in line:
            yield shlex.split(line.lstrip("# "), comments=False)


def check(file, argvs, binaries, errors):
    found = 0
    for argv in argvs:
        for name, known in binaries.items():
            used = used_flags(argv, name)
            if used is None:
                continue
            found += 1
            for flag in used:
                if flag not in known:
                    errors.append(f"{file}: {name} has no flag {flag}")
    if found == 0:
        errors.append(f"{file}: no reattn command found")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--deploy", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--run", required=True)
    args = p.parse_args()
    binaries = {"reattn-server": flags_of(args.server), "reattn-run": flags_of(args.run)}
    assert "--config" in binaries["reattn-server"], "reattn-server --help lists no --config"
    errors = []

    sbatch = os.path.join(args.deploy, "slurm", "reattn.sbatch")
    if subprocess.run(["bash", "-n", sbatch]).returncode != 0:
        errors.append(f"{sbatch}: bash syntax error")
    with open(sbatch) as f:
        text = f.read()
    if not re.search(r"^#SBATCH --ntasks-per-node=\d+", text, re.M):
        errors.append(f"{sbatch}: no --ntasks-per-node")
    if "--gpus-per-task" in text.replace("# No --gpus-per-task", "") or "CUDA_VISIBLE_DEVICES" in text:
        errors.append(f"{sbatch}: binds a task to one GPU; every rank must see all GPUs of its node")
    if "NCCL_NVLS_ENABLE=0" not in text:
        errors.append(f"{sbatch}: NCCL_NVLS_ENABLE=0 is not set")
    check(sbatch, shell_commands(text), binaries, errors)

    hostfile = os.path.join(args.deploy, "hostfile.example")
    with open(hostfile) as f:
        text = f.read()
    hosts = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    for line in hosts:
        if not re.fullmatch(r"[A-Za-z0-9._-]+ slots=\d+", line.strip()):
            errors.append(f"{hostfile}: bad line '{line}'")
    if not hosts:
        errors.append(f"{hostfile}: no hosts")
    check(hostfile, shell_commands(text), binaries, errors)

    manifest = os.path.join(args.deploy, "k8s", "mpijob.yaml")
    with open(manifest) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    jobs = [d for d in docs if d.get("kind") == "MPIJob"]
    if len(jobs) != 1 or jobs[0].get("apiVersion") != "kubeflow.org/v2beta1":
        errors.append(f"{manifest}: expected one kubeflow.org/v2beta1 MPIJob")
    else:
        specs = jobs[0]["spec"]["mpiReplicaSpecs"]
        argvs = [c.get("command", []) + c.get("args", []) for role in specs.values()
                 for c in role["template"]["spec"]["containers"]]
        check(manifest, argvs, binaries, errors)
        if not any("NCCL_NVLS_ENABLE=0" in argv for argv in argvs):
            errors.append(f"{manifest}: mpirun does not pass NCCL_NVLS_ENABLE=0")
    for cm in (d for d in docs if d.get("kind") == "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            if key.endswith(".yaml"):
                # The service's own loader must accept it: run one tiny query on the CPU.
                path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"reattn-deploy-{os.getpid()}.yaml")
                with open(path, "w") as out:
                    out.write(value)
                proc = subprocess.run([args.run, "--config", path, "--synthetic-tokens", "100", "--layer", "0",
                                       "--backend", "cpu", "--summary"], capture_output=True, text=True, timeout=60)
                os.unlink(path)
                if proc.returncode != 0:
                    errors.append(f"{manifest}: ConfigMap {key} is rejected: {proc.stderr.strip()}")

    for e in errors:
        print("FAIL", e)
    if errors:
        sys.exit(1)
    print("ok  deploy/: hostfile, sbatch and MPIJob parse and use only existing flags")


if __name__ == "__main__":
    main()
