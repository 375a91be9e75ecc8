// Runs one case of Node's own threadsafe function and prints one JSON line.
// Usage: node driver.js ADDON N THREADS MAX_QUEUE_SIZE
'use strict';
const [addonPath, ...nums] = process.argv.slice(2);
const [n, threads, maxQueueSize] = nums.map(Number);
const addon = require(addonPath);

let sum = 0;
let count = 0;
let t1 = 0n;
const t0 = process.hrtime.bigint();
addon
  .run(n, threads, maxQueueSize, (i) => {
    sum += i;
    count += 1;
    if (count === n) t1 = process.hrtime.bigint();
  })
  .then(() => {
    const seconds = Number(t1 - t0) / 1e9;
    process.stdout.write(JSON.stringify({ n, count, sum, seconds }) + '\n');
  });
