"""Patching an operating system over SSH, with no agent on the machine.

- `settings`: the SSH keys of a config table (user, port, key, sudo, known_hosts, timeouts).
- `ssh`: one connection to one machine: host-key checks, argv commands, timeouts.
- `packages`: the package-manager driver interface and the identity of a package set.
- `apt`: the Debian/Ubuntu driver.
- `dnf`: the RHEL-family driver (dnf 4), for ssh backends with `package_manager = "dnf"`.
- `system`: boot id, reboot and wait, `systemctl is-system-running`.
- `patcher`: the package-set steps (assess under a baseline and check with stage pins,
  record, install and reboot, verify) and the ledger of package sets.
- `baseline`: a baseline's pure decision on a pending list (excludes, includes, security
  only, approve_after from journaled first sightings, the reboot policy).
- `assessment`: what a package backend found on a target under a baseline, and the
  optional backend protocol (`AssessesPackages`) that `plan`, compliance and the engine use.

Used by the plain `ssh` backend (patchd.backends.ssh) and by the vSphere VM flow with
`patch.method = "apt"` (patchd.backends.vsphere.guestos).
Nothing here imports paramiko at import time: it is loaded on the first connection, so an
idle daemon that patches only containers never pays for it.
"""
