# As %systemd_preun: on the last removal ($1 = 0) stop and disable; upgrades keep it.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now keel.service >/dev/null 2>&1 || :
fi
exit 0
