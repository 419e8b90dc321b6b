// A small JVM HTTP service (the JDK's own com.sun.net.httpserver) for the
// JVM tests: answers "nonce N" where N is fixed at its (cold) start.
//
// GET /random draws from a java.util.Random seeded once at start: every
// restore of one image draws the same. GET /reseed gives it a new seed from
// the kernel (SecureRandom): what its `hooks.after_restore` calls
// (examples/jvm/hello.yaml), so each restore draws its own.
import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
import java.security.SecureRandom;
import java.util.Random;
public class Hello {
    static final Random random = new Random();
    public static void main(String[] a) throws Exception {
        int port = Integer.parseInt(a[0]);
        long nonce = System.nanoTime();
        // Some start-up work, as a JVM service has.
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < 200000; i++) sb.append(Integer.toHexString(i * 31));
        HttpServer s = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 0);
        s.createContext("/", ex -> reply(ex, "nonce " + nonce + "\n"));
        s.createContext("/random", ex -> reply(ex, random.nextLong() + "\n"));
        s.createContext("/reseed", ex -> {
            random.setSeed(new SecureRandom().nextLong());
            reply(ex, "reseeded\n");
        });
        s.start();
        System.out.println("hello ready on " + port);
    }
    static void reply(com.sun.net.httpserver.HttpExchange ex, String body) throws java.io.IOException {
        byte[] b = body.getBytes();
        ex.sendResponseHeaders(200, b.length);
        ex.getResponseBody().write(b);
        ex.close();
    }
}
