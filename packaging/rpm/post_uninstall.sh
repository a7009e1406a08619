# As %systemd_postun_with_restart: reload units; after an upgrade restart keel.
# /var/lib/keel and a changed /etc/keel/keel.toml (.rpmsave) are kept.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart keel.service >/dev/null 2>&1 || :
    fi
fi
exit 0
