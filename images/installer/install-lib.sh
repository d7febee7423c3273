# netbootd installer: the functions that find the target disk, stream the disk image onto
# it and report progress. POSIX sh for busybox ash. The installer's /init sources this file;
# so do the tests and bench/install_bench.py, on the host, with busybox.
#
# Settings (environment; the defaults are what the installer uses):
#   BB           busybox command                      (busybox)
#   NBD_TMP      scratch directory, RAM in the installer (/tmp); FIFOs and a few small files
#   NBD_CHUNK    largest range fetched with one request (256 MiB); ranges are also at most
#                1/20 of the image, so progress is reported at least every 5 %
#   NBD_RETRIES  attempts per chunk before giving up (30); NBD_BACKOFF_MAX seconds (8)
#   NBD_SYS, NBD_DEV, NBD_MOUNTS, NBD_SWAPS   /sys, /dev, /proc/mounts, /proc/swaps
#   EVENTS, TOKEN, MAC                        where and as whom events are reported
#
# After a function fails, NBD_REASON says why in one line (it becomes the event's reason).

: "${BB:=busybox}" "${NBD_TMP:=/tmp}" "${NBD_CHUNK:=268435456}" "${NBD_RETRIES:=30}"
: "${NBD_BACKOFF_MAX:=8}" "${NBD_SYS:=/sys}" "${NBD_DEV:=/dev}"
: "${NBD_MOUNTS:=/proc/mounts}" "${NBD_SWAPS:=/proc/swaps}"
NBD_REASON=

nbd_log() {
    echo "NETBOOTD-INSTALL: $*" >&2
}

nbd_fail() { # nbd_fail REASON: set NBD_REASON, log it, return 1
    NBD_REASON="$*"
    nbd_log "error: $*"
    return 1
}

# ------------------------------------------------------------------------------ events

nbd_urlencode() { # nbd_urlencode STRING -> RFC 3986 percent-encoding (unreserved kept)
    NBD_S="$1" LC_ALL=C $BB awk 'BEGIN {
        for (i = 1; i < 256; i++) ord[sprintf("%c", i)] = i
        s = ENVIRON["NBD_S"]; out = ""
        for (i = 1; i <= length(s); i++) {
            c = substr(s, i, 1)
            if (c ~ /[A-Za-z0-9._~-]/) out = out c
            else out = out sprintf("%%%02X", ord[c])
        }
        print out
    }'
}

nbd_event_url() { # nbd_event_url PHASE PROGRESS [REASON] -> the GET URL of one event
    _sep='?'
    case "$EVENTS" in *\?*) _sep='&';; esac
    echo "$EVENTS${_sep}mac=$(nbd_urlencode "$MAC")&phase=$1&token=$(nbd_urlencode "$TOKEN")&progress=$2&reason=$(nbd_urlencode "$3")"
}

nbd_event() { # nbd_event PHASE PROGRESS [REASON]: report, retrying; never fails the caller
    nbd_log "event $1 progress=$2${3:+ reason=$3}"
    [ -n "$EVENTS" ] || return 0
    _url=$(nbd_event_url "$1" "$2" "$3")
    _try=0
    while [ $_try -lt 5 ]; do
        # busybox 1.35's `wget -T` crashes; a timeout bounds a hung server instead.
        $BB timeout 10 $BB wget -q -O /dev/null "$_url" 2>/dev/null && return 0
        _try=$((_try + 1))
        $BB sleep 1
    done
    nbd_log "could not report $1 to $EVENTS"
    return 0
}

nbd_event_async() { # progress events must not stall the download (nor hold its FIFO)
    nbd_event "$@" 9>&- &
}

# ------------------------------------------------------------------------------ disks

nbd_disks() { # whole, non-removable disks: "NAME BYTES" per line
    for _d in "$NBD_SYS"/block/*; do
        [ -e "$_d" ] || continue
        _n=${_d##*/}
        case "$_n" in
            loop*|ram*|zram*|sr*|fd*|md*|dm-*|nbd*|mmcblk*boot*|mmcblk*rpmb) continue;;
        esac
        [ -e "$_d/device" ] || continue                 # virtual block devices have none
        [ "$(cat "$_d/removable" 2>/dev/null)" = 0 ] || continue
        _s=$(cat "$_d/size" 2>/dev/null)
        [ "${_s:-0}" -gt 0 ] || continue
        echo "$_n $((_s * 512))"
    done
}

nbd_disk_bytes() { # nbd_disk_bytes NAME -> size in bytes
    _s=$(cat "$NBD_SYS/block/$1/size" 2>/dev/null) || return 1
    echo $((_s * 512))
}

nbd_by_path() { # nbd_by_path pci-0000:00:04.0[-nvme-N|-ata-N|-scsi-H:C:T:L] -> NAME
    # udev makes /dev/disk/by-path; the installer has no udev, so match the same names
    # against each disk's sysfs path (the PCI address, then the suffix).
    _p=${1#virtio-}
    _pci=$(echo "$_p" | $BB sed -n 's/^pci-\([0-9a-fA-F]\{4\}:[0-9a-fA-F]\{2\}:[0-9a-fA-F]\{2\}\.[0-7]\).*/\1/p')
    [ -n "$_pci" ] || return 1
    _rest=${_p#pci-"$_pci"}
    _found=
    for _n in $(nbd_disks | $BB cut -d' ' -f1); do
        _dp=$($BB readlink -f "$NBD_SYS/block/$_n")
        case "$_dp" in */"$_pci"/*) ;; *) continue;; esac
        case "$_rest" in
            "") ;;
            -nvme-*) case "$_n" in *n"${_rest#-nvme-}") ;; *) continue;; esac;;
            -ata-*) case "$_dp" in */ata"${_rest#-ata-}"/*) ;; *) continue;; esac;;
            -scsi-*) case "$_dp" in */"${_rest#-scsi-}"/*) ;; *) continue;; esac;;
            *) continue;;
        esac
        [ -z "$_found" ] || return 1                     # ambiguous: refuse to guess
        _found=$_n
    done
    [ -n "$_found" ] && echo "$_found"
}

nbd_in_use() { # nbd_in_use NAME: 0 (with NBD_REASON) if the disk or a partition is in use
    _dev="$NBD_DEV/$1"
    if $BB awk -v d="$_dev" -v n="/dev/$1" '
            { s = $1; if (s == d || s == n || index(s, d) == 1 || index(s, n) == 1) f = 1 }
            END { exit !f }' "$NBD_MOUNTS" 2>/dev/null; then
        NBD_REASON="disk /dev/$1 is mounted"
        return 0
    fi
    if [ -r "$NBD_SWAPS" ] && $BB awk -v d="$_dev" -v n="/dev/$1" '
            NR > 1 { s = $1; if (index(s, d) == 1 || index(s, n) == 1) f = 1 }
            END { exit !f }' "$NBD_SWAPS"; then
        NBD_REASON="disk /dev/$1 is used as swap"
        return 0
    fi
    for _h in "$NBD_SYS/block/$1"/holders/* "$NBD_SYS/block/$1"/"$1"*/holders/*; do
        [ -e "$_h" ] || continue
        NBD_REASON="disk /dev/$1 is held by ${_h##*/} (RAID or device mapper)"
        return 0
    done
    return 1
}

nbd_pick_disk() { # nbd_pick_disk SELECTOR USIZE: sets NBD_DISK; fails with NBD_REASON
    _sel=$1 _usize=$2 _name=
    case "$_sel" in
        ""|smallest|largest)
            _list=$(nbd_disks | $BB sort -n -k2)
            [ -n "$_list" ] || { nbd_fail "no non-removable disk found"; return 1; }
            if [ "$_sel" = largest ]; then
                _name=$(echo "$_list" | $BB tail -n 1 | $BB cut -d' ' -f1)
            else
                _name=$(echo "$_list" | $BB head -n 1 | $BB cut -d' ' -f1)
            fi
            ;;
        /dev/disk/by-path/*)
            if [ -e "$_sel" ]; then
                _name=$($BB readlink -f "$_sel"); _name=${_name##*/}
            else
                _name=$(nbd_by_path "${_sel#/dev/disk/by-path/}") ||
                    { nbd_fail "no single disk matches $_sel"; return 1; }
            fi
            ;;
        /dev/*)
            _name=${_sel#/dev/}
            if [ -e "$NBD_DEV/$_name" ]; then
                _r=$($BB readlink -f "$NBD_DEV/$_name"); _name=${_r##*/}
            fi
            ;;
        *) nbd_fail "disk selector '$_sel' is not a /dev path, smallest or largest"; return 1;;
    esac
    [ -e "$NBD_SYS/block/$_name" ] ||
        { nbd_fail "disk $_sel not found (not a whole disk)"; return 1; }
    if nbd_in_use "$_name"; then nbd_fail "$NBD_REASON"; return 1; fi
    _bytes=$(nbd_disk_bytes "$_name")
    if [ "${_bytes:-0}" -lt "$_usize" ]; then
        nbd_fail "disk /dev/$_name ($_bytes bytes) is smaller than the image ($_usize bytes)"
        return 1
    fi
    NBD_DISK="$NBD_DEV/$_name"
}

# ------------------------------------------------------------------------------ streaming

nbd_fetch_range() { # nbd_fetch_range URL START END: bytes START..END of URL onto stdout
    # One curl request per attempt, written straight into the caller's pipe. The request
    # carries its own Range header and `-C START`, so curl refuses (before writing a byte)
    # an answer that is not a 206 starting at START, and --max-filesize refuses a 200 with
    # the whole file. A dropped connection resumes at the first byte not yet written: curl
    # reports how many body bytes it wrote (size_download). Failures in a row are counted;
    # an attempt that moved data starts the count over.
    _url=$1 _start=$2 _end=$3 _from=$2 _fails=0 _wait=1
    while :; do
        $NBD_CURL -sS -f -L -D "$NBD_W/hdr" -H "Range: bytes=$_from-$_end" -C "$_from" \
            --max-filesize $((_end - _from + 1)) --connect-timeout 15 -y 30 -Y 1024 \
            -w '%{stderr}NBD-GOT %{size_download}\n' "$_url" 2> "$NBD_W/curl.err"
        _rc=$?
        if [ "$_rc" -eq 23 ] || [ "$_rc" -gt 128 ]; then     # the pipe's reader is gone
            nbd_fail "decompressor stopped: $($BB tail -n 1 "$NBD_W/dec.err" 2>/dev/null)"
            return 1
        fi
        _got=$($BB sed -n 's/^NBD-GOT \([0-9]*\).*/\1/p' "$NBD_W/curl.err" | $BB tail -n 1)
        _from=$((_from + ${_got:-0}))
        [ "$_from" -eq $((_end + 1)) ] && return 0
        if [ "$_from" -gt $((_end + 1)) ]; then
            nbd_fail "server sent more than bytes $_start-$_end"; return 1
        fi
        _status=$($BB tr -d '\r' < "$NBD_W/hdr" 2>/dev/null | $BB grep '^HTTP/' | $BB tail -n 1)
        _why=$($BB grep -v '^NBD-GOT ' "$NBD_W/curl.err" | $BB tail -n 1)
        case "$_status" in
            *" 200"*) nbd_fail "server ignores Range requests ($_status)"; return 1;;
            *" 4"[0-9][0-9]*) nbd_fail "$_url: $_status"; return 1;;
            *" 206"*) ;;
            ?*) _why=$_status;;
        esac
        _why=${_why:-no response (curl exit $_rc)}
        [ "${_got:-0}" -eq 0 ] || _fails=0 _wait=1
        _fails=$((_fails + 1))
        if [ "$_fails" -ge "$NBD_RETRIES" ]; then
            nbd_fail "download of bytes $_from-$_end failed $_fails times: $_why"; return 1
        fi
        nbd_log "bytes $_from-$_end: $_why; resuming at byte $_from"
        $BB sleep "$_wait"
        _wait=$((_wait * 2)); [ "$_wait" -le "$NBD_BACKOFF_MAX" ] || _wait=$NBD_BACKOFF_MAX
    done
}

nbd_decompress_cmd() { # nbd_decompress_cmd COMPRESSION -> the filter that decompresses it
    case "$1" in
        zst|zstd) echo "zstd -d -c -q";;
        xz) echo "xz -d -c -T0";;
        gz|gzip) echo "gzip -d -c";;
        none|"") echo "cat";;
        *) return 1;;
    esac
}

nbd_sha256_cmd() { # the fastest sha256 there is: openssl (SHA-NI), coreutils, busybox
    if command -v openssl >/dev/null 2>&1; then echo "openssl dgst -sha256 -r"
    elif command -v sha256sum >/dev/null 2>&1; then echo "sha256sum"
    else echo "$BB sha256sum"
    fi
}

nbd_tee_cmd() { # a tee that reads more than busybox's 1 KiB per system call (coreutils)
    # By path: busybox ash runs its own applet for a bare `tee`.
    for _d in $(echo "$PATH" | $BB tr : ' '); do
        [ -x "$_d/tee" ] || continue
        case "$($BB readlink -f "$_d/tee")" in *busybox*) continue;; esac
        echo "$_d/tee"; return 0
    done
    echo "$BB tee"
}

nbd_write_image() { # nbd_write_image URL SIZE USIZE SHA256 COMPRESSION TARGET
    # Streams URL (SIZE bytes, compressed) through one decompressor onto TARGET, hashing the
    # decompressed bytes on the way (tee into a FIFO read by sha256). The download is a
    # series of Range requests of at most 1/20 of SIZE (and NBD_CHUNK), each written by curl
    # straight into the decompressor's FIFO and resumed at the first missing byte after a
    # dropped connection. Reports `installing` after every range (each is <= 5 % of SIZE).
    _url=$1 _size=$2 _usize=$3 _sha=$4 _comp=$5 _target=$6
    _dec=$(nbd_decompress_cmd "$_comp") ||
        { nbd_fail "unknown compression '$_comp'"; return 1; }
    NBD_CURL=$(command -v curl) || { nbd_fail "curl not found"; return 1; }
    _shacmd=$(nbd_sha256_cmd) _tee=$(nbd_tee_cmd)
    _chunk=$(( (_size + 19) / 20 ))
    [ "$_chunk" -le "$NBD_CHUNK" ] || _chunk=$NBD_CHUNK
    [ "$_chunk" -ge 65536 ] || _chunk=65536
    _w="$NBD_TMP/nbd-write.$$"
    NBD_W=$_w
    $BB rm -rf "$_w"; $BB mkdir -p "$_w"
    $BB mkfifo "$_w/in" "$_w/sha"
    $_shacmd < "$_w/sha" > "$_w/sha.out" 2> "$_w/sha.err" &
    _shapid=$!
    { $_dec < "$_w/in" 2> "$_w/dec.err"; echo $? > "$_w/dec.rc"; } |
        { $_tee "$_w/sha" > "$_target" 2> "$_w/tee.err"; echo $? > "$_w/tee.rc"; } &
    _pipepid=$!
    exec 9> "$_w/in"
    _pos=0 _ok=1 _t0=$($BB date +%s)
    nbd_log "streaming $_url ($_size bytes $_comp -> $_usize bytes) to $_target, ranges of $_chunk"
    while [ "$_pos" -lt "$_size" ]; do
        _end=$((_pos + _chunk - 1)); [ "$_end" -lt "$_size" ] || _end=$((_size - 1))
        if ! nbd_fetch_range "$_url" "$_pos" "$_end" >&9; then _ok=; break; fi
        _pos=$((_end + 1))
        _pct=$((_pos * 100 / _size))
        [ "$_pct" -lt 100 ] || _pct=99              # 100 means written, synced and verified
        nbd_event_async installing "$_pct"
    done
    # Closing the FIFO ends the pipeline: after a failure the decompressor sees a truncated
    # stream and stops, tee and sha256 follow (whatever was written is not a valid disk).
    exec 9>&-
    wait "$_pipepid"; wait "$_shapid"
    if [ -z "$_ok" ]; then
        $BB rm -rf "$_w"
        return 1
    fi
    _decrc=$(cat "$_w/dec.rc" 2>/dev/null) _teerc=$(cat "$_w/tee.rc" 2>/dev/null)
    if [ "$_decrc" != 0 ]; then
        nbd_fail "decompression failed ($_comp): $($BB tail -n 1 "$_w/dec.err")"
    elif [ "$_teerc" != 0 ]; then
        nbd_fail "writing $_target failed: $($BB tail -n 1 "$_w/tee.err")"
    else
        _got=$($BB cut -d' ' -f1 < "$_w/sha.out")
        if [ "$_got" != "$_sha" ]; then
            nbd_fail "sha256 mismatch: image is $_got, expected $_sha"
        else
            _ok=2
        fi
    fi
    $BB rm -rf "$_w"
    [ "$_ok" = 2 ] || return 1
    nbd_log "written and verified in $(( $($BB date +%s) - _t0 ))s: sha256 $_got"
    return 0
}

nbd_install() { # nbd_install URL SIZE USIZE SHA256 COMPRESSION SELECTOR -> reports, 0 = installed
    nbd_event installing 0
    nbd_pick_disk "$6" "$3" || { nbd_event failed 0 "$NBD_REASON"; return 1; }
    _dev=$NBD_DISK
    nbd_log "target disk $_dev"
    if ! nbd_write_image "$1" "$2" "$3" "$4" "$5" "$_dev"; then
        nbd_event failed 0 "$NBD_REASON"; return 1
    fi
    $BB sync
    $BB blockdev --flushbufs "$_dev" 2>/dev/null
    nbd_event installed 100
    return 0
}
