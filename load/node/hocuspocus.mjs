// One Hocuspocus server (a peer in the load comparison): node hocuspocus.mjs PORT REDIS_PORT
// Two of them on one Redis are Hocuspocus's way to run replicas (extension-redis).
import { Server } from "@hocuspocus/server";
import { Redis } from "@hocuspocus/extension-redis";

const [port, redisPort] = process.argv.slice(2).map(Number);
const server = new Server({
  port,
  address: "127.0.0.1",
  quiet: true,
  extensions: redisPort ? [new Redis({ host: "127.0.0.1", port: redisPort })] : [],
});
await server.listen();
console.log(`hocuspocus listening on ${port}`);
