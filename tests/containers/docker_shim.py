"""A `docker` for the tests: podman behind docker's own command line, as Debian's podman-docker gives.

No Docker engine runs on these machines, and podman accepts more than docker does (--tls-verify,
--authfile, --digestfile, ...), so a plain alias would let a podman-only flag pass as docker's.
This stand-in first checks every command against the docker CLI's documented options (docs.docker.com
reference, docker 24-27) and refuses anything else as docker does ("unknown flag", exit 125); then it
runs podman. It adds one thing the Docker daemon does by itself: registries on 127.0.0.0/8 are
reached over plain HTTP (dockerd's built-in insecure range), which podman needs to be told.

    python docker_shim.py [GLOBAL OPTIONS] COMMAND [OPTIONS] ARGS...     (PODMAN names podman's path)
"""

from __future__ import annotations

import os
import sys

# option -> takes a value; the long and short names docker documents for each command we may be sent.
GLOBAL = {"--config": True, "-c": True, "--context": True, "-D": False, "--debug": False, "-H": True, "--host": True, "-l": True, "--log-level": True}
COMMANDS: dict[str, dict[str, bool]] = {
    "build": {
        "--add-host": True, "--allow": True, "--annotation": True, "--attest": True, "--build-arg": True, "--build-context": True,
        "--builder": True, "--cache-from": True, "--cache-to": True, "--cgroup-parent": True, "-f": True, "--file": True,
        "--iidfile": True, "--label": True, "--load": False, "--metadata-file": True, "--network": True, "--no-cache": False,
        "--no-cache-filter": True, "-o": True, "--output": True, "--platform": True, "--progress": True, "--provenance": True,
        "--pull": False, "--push": False, "-q": False, "--quiet": False, "--sbom": True, "--secret": True, "--shm-size": True,
        "--ssh": True, "-t": True, "--tag": True, "--target": True, "--ulimit": True,
    },
    "image inspect": {"-f": True, "--format": True, "--platform": True},
    "inspect": {"-f": True, "--format": True, "-s": False, "--size": False, "--type": True},
    "pull": {"-a": False, "--all-tags": False, "--disable-content-trust": False, "--platform": True, "-q": False, "--quiet": False},
    "push": {"-a": False, "--all-tags": False, "--disable-content-trust": False, "--platform": True, "-q": False, "--quiet": False},
    "tag": {},
    "rmi": {"-f": False, "--force": False, "--no-prune": False},
    "run": {
        "--rm": False, "--name": True, "--pull": True, "-p": True, "--publish": True, "--network": True, "--label": True, "-l": True,
        "-v": True, "--volume": True, "-e": True, "--env": True, "-u": True, "--user": True, "--entrypoint": True, "-d": False,
        "--detach": False, "-i": False, "--interactive": False, "-t": False, "--tty": False, "-w": True, "--workdir": True,
        "--init": False, "--mount": True, "--read-only": False, "--stop-timeout": True, "--sig-proxy": True,
    },
    "stop": {"-s": True, "--signal": True, "-t": True, "--time": True, "--timeout": True},
    "rm": {"-f": False, "--force": False, "-l": False, "--link": False, "-v": False, "--volumes": False},
    "ps": {"-a": False, "--all": False, "-f": True, "--filter": True, "--format": True, "-n": True, "--last": True, "-l": False,
           "--latest": False, "--no-trunc": False, "-q": False, "--quiet": False, "-s": False, "--size": False},
    "logs": {"--details": False, "-f": False, "--follow": False, "--since": True, "-n": True, "--tail": True, "-t": False,
             "--timestamps": False, "--until": True},
}  # fmt: skip
LOOPBACK = ("127.", "localhost:", "localhost/")


def refuse(message: str) -> None:
    print(f"docker: {message}\nSee 'docker --help'.", file=sys.stderr)
    sys.exit(125)


def check(args: list[str], options: dict[str, bool]) -> tuple[int, list[str]]:
    """(how many leading args are options, the positional args); refuses a flag docker lacks."""
    i, positional = 0, []
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return i, positional + args[i + 1 :]
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            if name not in options:
                refuse(f"unknown flag: {name}")
            i += 2 if options[name] and "=" not in arg else 1
            continue
        positional.append(arg)
        i += 1
    return i, positional


def main(argv: list[str]) -> None:
    podman = os.environ.get("PODMAN", "/usr/bin/podman")
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name = argv[i].split("=", 1)[0]
        if name not in GLOBAL:
            refuse(f"unknown flag: {name}")
        i += 2 if GLOBAL[name] and "=" not in argv[i] else 1
    global_options, rest = argv[:i], argv[i:]
    if not rest:
        refuse("no command")
    command = " ".join(rest[:2]) if " ".join(rest[:2]) in COMMANDS else rest[0]
    if command not in COMMANDS:
        refuse(f"'{rest[0]}' is not a command this stand-in knows")
    args = rest[len(command.split()) :]
    # run: options end at the image; what follows is the container's command, not docker's.
    end = next((k for k, arg in enumerate(args) if not arg.startswith("-") and (k == 0 or not _takes_value(args[k - 1], COMMANDS[command]))), len(args)) if command == "run" else len(args)
    _, positional = check(args[:end], COMMANDS[command])
    extra = []
    if command in ("push", "pull") and any(ref.startswith(LOOPBACK) for ref in positional):
        extra = ["--tls-verify=false"]  # dockerd's built-in insecure registries: 127.0.0.0/8
    os.execv(podman, [podman, *global_options, *command.split(), *extra, *args])


def _takes_value(arg: str, options: dict[str, bool]) -> bool:
    return arg.startswith("-") and "=" not in arg and options.get(arg, False)


if __name__ == "__main__":
    main(sys.argv[1:])
