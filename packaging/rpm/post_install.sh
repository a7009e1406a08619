# As %systemd_post: on first install apply the preset (enable), on upgrade nothing here.
install -d -o keel -g keel -m 0700 /var/lib/keel
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl preset keel.service >/dev/null 2>&1 || :
    fi
fi
exit 0
