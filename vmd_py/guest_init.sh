#!/bin/sh
# /init of the vmd-py default guest: busybox sh as PID 1 in the initramfs.
# Kernel command line understood here:
#   <module>.<param>=<value>   options for the modules in /lib/modules/<kver>/vmd.load-order
#   ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>   or   ip=dhcp
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /sbin /usr/bin /usr/sbin /etc /var
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /run /var/run
mkdir -p /var/log /run/modopts

say() { echo "vmd-guest: $*" > /dev/console; }

# Module options come from the command line because the kernel only applies
# <module>.<param>= itself to built-in code, never to modules loaded later.
ip_arg=""
set -f
for tok in $(cat /proc/cmdline); do
	case "$tok" in
	ip=*) ip_arg=${tok#ip=} ;;
	*=*)
		key=${tok%%=*}
		case "$key" in
		*.*) ;;
		*) continue ;;
		esac
		mod=$(echo "${key%%.*}" | tr - _)
		param=${key#*.}
		case "$mod" in
		"" | *[!a-z0-9_]*) continue ;;
		esac
		echo "$param=${tok#*=}" >> "/run/modopts/$mod"
		;;
	esac
done

moddir=/lib/modules/$(uname -r)
if [ -f "$moddir/vmd.load-order" ]; then
	while read -r rel; do
		name=${rel##*/}
		name=$(echo "${name%.ko}" | tr - _)
		opts=""
		[ -f "/run/modopts/$name" ] && opts=$(cat "/run/modopts/$name")
		# $opts is split on purpose: one word per param=value.
		insmod "$moddir/$rel" $opts || say "insmod $name failed"
	done < "$moddir/vmd.load-order"
fi
set +f

wait_dev() {
	n=0
	while [ ! -e "/sys/class/net/$1" ] && [ "$n" -lt 50 ]; do
		usleep 100000
		n=$((n + 1))
	done
	[ -e "/sys/class/net/$1" ] || { say "no such device $1"; return 1; }
}

mask_prefix() {
	case "$2" in
	"") echo 24 ;;
	*.*) ipcalc -p "$1" "$2" | sed -n 's/^PREFIX=//p' ;;
	*) echo "$2" ;;
	esac
}

dhcp() {
	wait_dev "$1" || return
	ip link set "$1" up
	udhcpc -i "$1" -s /etc/udhcpc.script -t 5 -T 2 -b -S
}

cat > /etc/udhcpc.script <<'EOF'
#!/bin/sh
case "$1" in
deconfig)
	ip addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound | renew)
	ip addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	if [ -n "$router" ]; then
		set -- $router
		ip route replace default via "$1" dev "$interface"
	fi
	echo "vmd-guest: dhcp $interface $ip/${mask:-24}" > /dev/console
	;;
esac
exit 0
EOF
chmod 755 /etc/udhcpc.script

configure_ip() {
	case "$1" in
	"" | off | none) return ;;
	dhcp | on | any | both) dhcp eth0; return ;;
	esac
	IFS=: read -r client server gw mask host dev auto rest <<EOF
$1
EOF
	dev=${dev:-eth0}
	case "$auto" in
	dhcp | on | any | both) dhcp "$dev"; return ;;
	esac
	[ -n "$host" ] && hostname "$host"
	[ -n "$client" ] || return
	wait_dev "$dev" || return
	case "$client" in
	*/*) addr=$client ;;
	*) addr=$client/$(mask_prefix "$client" "$mask") ;;
	esac
	ip addr add "$addr" dev "$dev"
	ip link set "$dev" up
	[ -n "$gw" ] && ip route add default via "$gw" dev "$dev"
	say "ip $dev $addr"
}

ip link set lo up
configure_ip "$ip_arg"

# busybox acpid maps the ACPI power button (KEY_POWER from the button driver,
# seen through evdev) to /etc/acpi/PWRF/00000080.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
acpid -l /var/log/acpid.log

iperf3 -s -D

say ready

while :; do
	setsid cttyhack sh
	sleep 1
done
