# telespool %pre: create the system user and group (useradd -r).
getent group telespool >/dev/null || groupadd -r telespool
getent passwd telespool >/dev/null || \
    useradd -r -g telespool -d /var/lib/telespool -M -s /sbin/nologin \
        -c "telespool OpenTelemetry agent" telespool
exit 0
