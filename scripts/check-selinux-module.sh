#!/bin/sh
# Compile the SELinux policy module in selinux/ against the reference-policy
# development files of the distribution, the way `hostprep selinux install`
# builds it on a host.  Exit status non-zero on any error: a syntax error, an
# undefined type, class, permission or interface, or a rule without a comment.
# Also compiles the Vagrant bed's lab-only stand-in for the 'container' module
# (vagrant/selinux-standin/container.te).
#
#   sh scripts/check-selinux-module.sh            check selinux/
#   sh scripts/check-selinux-module.sh DIR        check the module sources in DIR
#
# Installs what compiling needs when it is missing (needs root then):
#   RHEL 9 family: dnf install selinux-policy-devel
#       (pulls in checkpolicy, m4, make, policycoreutils-devel)
#   Debian/Ubuntu: apt-get install --no-install-recommends selinux-policy-dev
#       (refpolicy headers and /usr/share/selinux/devel/Makefile; pulls in
#        checkpolicy, semodule-utils, m4, make, gawk).  Its postinst writes an
#       /etc/selinux/config; without an SELinux kernel that file does nothing.
# Nothing is loaded into a running policy: no semodule -i, no restorecon.
set -eu
cd "$(dirname "$0")/.."
src=${1:-selinux}
name=hostprep_proxy
makefile=/usr/share/selinux/devel/Makefile

if [ ! -f "$src/$name.te" ]; then
    echo "check-selinux-module: $src/$name.te not found" >&2
    exit 2
fi

have_tools() {
    [ -f "$makefile" ] && command -v checkmodule >/dev/null 2>&1 \
        && command -v semodule_package >/dev/null 2>&1 && command -v m4 >/dev/null 2>&1 \
        && command -v make >/dev/null 2>&1
}

if ! have_tools; then
    if [ "$(id -u)" != 0 ]; then
        echo "check-selinux-module: $makefile or checkmodule/semodule_package missing;" \
             "run as root to install them (dnf install selinux-policy-devel or" \
             "apt-get install selinux-policy-dev)" >&2
        exit 2
    fi
    if command -v dnf >/dev/null 2>&1; then
        dnf install -y -q selinux-policy-devel
    elif command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends \
            selinux-policy-dev checkpolicy semodule-utils m4 make gawk >/dev/null
    else
        echo "check-selinux-module: neither dnf nor apt-get found; install the SELinux" \
             "reference policy development files by hand" >&2
        exit 2
    fi
    if ! have_tools; then
        echo "check-selinux-module: $makefile still missing after installing the packages" >&2
        exit 2
    fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hostprep-selinux-check.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# 1. Every statement of the .te carries a comment: the line right above each
#    allow rule, type declaration, interface call and require block is a comment.
awk -v f="$src/$name.te" '
    /^(allow|dontaudit|auditallow|neverallow|type|typeattribute|type_transition|gen_require|require|[a-z][a-z0-9_]*\()/ \
        && !/^policy_module\(/ {
        if (prev !~ /^[ \t]*#/) { printf "%s:%d: no comment above this rule: %s\n", f, NR, $0; bad = 1 }
    }
    { prev = $0 }
    END { exit bad }
' "$src/$name.te" >&2 || { echo "check-selinux-module: FAILED (uncommented rules)" >&2; exit 1; }

# 2. Compile the module exactly as `hostprep selinux install` does: a copy of the
#    sources, `make -f $makefile $name.pp`.
mkdir "$work/module"
cp "$src/$name.te" "$work/module/"
for ext in fc if; do
    [ -f "$src/$name.$ext" ] && cp "$src/$name.$ext" "$work/module/"
done
echo "check-selinux-module: compiling $src/$name.te with $makefile"
if ! make -C "$work/module" -f "$makefile" "$name.pp"; then
    echo "check-selinux-module: FAILED: $src/$name.te does not compile" >&2
    exit 1
fi
[ -s "$work/module/$name.pp" ] || { echo "check-selinux-module: FAILED: no $name.pp produced" >&2; exit 1; }

# 3. The interfaces of the .if are only expanded where they are called: compile a
#    throw-away module that calls each one, so a typo in them fails here too.
if [ -f "$src/$name.if" ]; then
    {
        echo "policy_module(${name}_iftest, 1.0.0)"
        echo "# A domain-less type to hand to each interface."
        echo "type ${name}_iftest_t;"
        sed -n "s/^interface(\`\([a-z0-9_]*\)',.*/\1(${name}_iftest_t)/p" "$src/$name.if"
    } > "$work/module/${name}_iftest.te"
    echo "check-selinux-module: compiling the interfaces of $src/$name.if:" \
         "$(grep -c '^interface(' "$src/$name.if") called"
    if ! make -C "$work/module" -f "$makefile" "${name}_iftest.pp"; then
        echo "check-selinux-module: FAILED: an interface of $src/$name.if does not compile" >&2
        exit 1
    fi
fi

# 4. The Vagrant bed's lab-only stand-in for container-selinux's 'container' module
#    (vagrant/selinux-standin/container.te, loaded by the bed's provisioner on Debian 12):
#    it must compile too, or the bed's selinux-module check finds out 15 minutes later.
standin=vagrant/selinux-standin/container.te
if [ -f "$standin" ]; then
    mkdir "$work/standin"
    cp "$standin" "$work/standin/"
    echo "check-selinux-module: compiling the bed's stand-in $standin"
    if ! make -C "$work/standin" -f "$makefile" container.pp; then
        echo "check-selinux-module: FAILED: $standin does not compile" >&2
        exit 1
    fi
fi

echo "check-selinux-module: ok ($src/$name.pp compiles: $(wc -c < "$work/module/$name.pp") bytes)"
