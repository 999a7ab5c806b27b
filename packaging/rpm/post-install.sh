# telespool %post: as %systemd_post telespool.service telespool.socket —
# on first install apply the distribution's preset (enable or not).
if [ "$1" -eq 1 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl --no-reload preset telespool.service telespool.socket >/dev/null 2>&1 || :
fi
exit 0
