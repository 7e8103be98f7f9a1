// Node's fetch (undici), as a server-side chat app streams: it asks for gzip and decodes it with
// zlib. Prints each SSE data line the moment it decodes it.
//
//     node stream.mjs URL BODY
const [url, body] = process.argv.slice(2);
const response = await fetch(url, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body,
});
if (response.headers.get("content-encoding") !== "gzip") {
  console.error("the response was not gzip: nothing of the decoder was tested");
  process.exit(2);
}
const decoder = new TextDecoder();
let buffered = "";
for await (const chunk of response.body) {
  buffered += decoder.decode(chunk, { stream: true });
  let end;
  while ((end = buffered.indexOf("\n")) >= 0) {
    const line = buffered.slice(0, end + 1);
    buffered = buffered.slice(end + 1);
    if (line.startsWith("data: ")) process.stdout.write(line);
  }
}
