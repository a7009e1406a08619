# The keel system user, before the files it owns arrive.
getent group keel >/dev/null || groupadd --system keel
getent passwd keel >/dev/null || useradd --system --gid keel --home-dir /var/lib/keel \
    --no-create-home --shell /sbin/nologin --comment "Keel service" keel
exit 0
