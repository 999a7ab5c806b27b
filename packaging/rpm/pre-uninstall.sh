# telespool %preun: as %systemd_preun telespool.service telespool.socket —
# on erase (not upgrade) disable and stop; SIGTERM runs the shutdown
# sequence, so buffered data reaches upstream or the spool.
if [ "$1" -eq 0 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl --no-reload disable --now telespool.service telespool.socket >/dev/null 2>&1 || :
fi
exit 0
