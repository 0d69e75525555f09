#!/bin/sh
# The seed's example job: count to N (default 30), one number a second, then print "done".
n=${1:-30}
i=1
while [ "$i" -le "$n" ]; do
    echo "$i"
    i=$((i + 1))
    [ "$i" -le "$n" ] && sleep 1
done
echo done
