# telespool %postun: as %systemd_postun_with_restart telespool.service —
# on upgrade restart the service (flush and spool, then the new version
# replays the spool); the socket keeps listening meanwhile. The spool
# (/var/lib/telespool) and a changed config are kept on erase.
if [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        /usr/bin/systemctl try-restart telespool.service >/dev/null 2>&1 || :
    fi
fi
exit 0
