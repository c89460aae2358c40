// A busserve client in TypeScript, written without busserve: the wire contract is schemas/messages.schema.json and
// schemas/asyncapi.json, the transport is the official nats package.
//
//   npm ci && npx tsc -p . && node dist/client.js nats://127.0.0.1:4222 "prompt text" [max_tokens] [cancel_after]
//
// 1. Publish a JSON GenerateRequest on busserve.v1.generate.<user> (busserve.v1.generate on an open bus) with an
//    inbox of our own as reply-to: the stream of the request arrives there.
// 2. Read events until the one terminal event (type "final" or "error"); "status" events (who holds the request)
//    are skipped. A token's index must be the next one due: anything else is a lost or repeated event.
// 3. With cancel_after, publish a Cancel after that many tokens; the stream still ends with its final event
//    (finish_reason "cancelled").
// On a secured bus set BUSSERVE_NATS_USER / BUSSERVE_NATS_PASSWORD: the user's inbox is _INBOX.<user>.
// Prints {"text", "tokens", "terminal"} as JSON; exit 0 on final, 2 on an error event, 3 on a timeout, 4 on a gap.
import { connect, createInbox, headers, type ConnectionOptions } from "nats";

interface TokenEvent { type: "token"; index: number; token_ids: number[]; text?: string }
interface StatusEvent { type: "status" }
interface TerminalEvent { type: "final" | "error"; [key: string]: unknown }
type StreamEvent = TokenEvent | StatusEvent | TerminalEvent;

const [url, prompt, maxTokens = "16", cancelAfter = ""] = process.argv.slice(2);
const user = process.env.BUSSERVE_NATS_USER ?? "";
const options: ConnectionOptions = { servers: url };
if (user) {
  options.user = user;
  options.pass = process.env.BUSSERVE_NATS_PASSWORD ?? "";
  options.inboxPrefix = `_INBOX.${user}`;
}
const nc = await connect(options);
const inbox = createInbox(options.inboxPrefix);
const sub = nc.subscribe(inbox);
const h = headers();
h.set("Content-Type", "application/json");
const requestId = `ts-${Date.now()}-${Math.floor(Math.random() * 1e6)}`;
const request = {
  type: "generate",
  request_id: requestId,
  messages: [{ role: "user", content: prompt }],
  sampling: { max_tokens: Number(maxTokens), temperature: 0, ignore_eos: cancelAfter !== "" },
  stream: { content_type: "json" },
};
const suffix = user ? `.${user}` : "";
nc.publish(`busserve.v1.generate${suffix}`, JSON.stringify(request), { reply: inbox, headers: h });

let text = "";
let next = 0;
let cancelled = false;
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 120_000);
for await (const m of sub) {
  const event = JSON.parse(new TextDecoder().decode(m.data)) as StreamEvent;
  if (event.type === "status") {
    continue;
  }
  if (event.type === "token") {
    if (event.index !== next) {
      console.error(`stream gap: token ${event.index} arrived where ${next} was due`);
      process.exit(4);
    }
    next += event.token_ids.length;
    text += event.text ?? "";
    if (cancelAfter !== "" && !cancelled && next >= Number(cancelAfter)) {
      cancelled = true;
      const cancel = { type: "cancel", request_id: requestId, reason: "the example cancels" };
      nc.publish(`busserve.v1.cancel${suffix}`, JSON.stringify(cancel), { headers: h });
    }
    continue;
  }
  clearTimeout(timer);
  console.log(JSON.stringify({ text, tokens: next, terminal: event }));
  await nc.drain();
  process.exit(event.type === "final" ? 0 : 2);
}
