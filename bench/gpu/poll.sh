#!/bin/sh
# Wait up to SECONDS for the captures to finish, then pack what they wrote into $OUT.
#   sh .gpu/poll.sh SECONDS
end=$(( $(date +%s) + $1 ))
while [ "$(date +%s)" -lt "$end" ] && [ ! -f /root/results/DONE ]; do sleep 5; done
tail -n 40 /root/results/campaign.log
tar -C /root -czf "$OUT/results.tar.gz" results
ls -la "$OUT"
